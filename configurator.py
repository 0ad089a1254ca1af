# Poor man's configurator, after nanoGPT's. A script defines its settings as globals, then runs
#     exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# and the command line overrides them:
#     python sample.py config/my_config.py --temperature=0.5 --start="Hello"
# A config file is Python that assigns settings (it can read the current ones). --key=value values are
# parsed with ast.literal_eval, and kept as the raw string when that fails (or when the setting is a string).
# What nanoGPT lacks: every mistake is one line on stderr and exit status 1 (an unknown key names the closest
# known one; a value of the wrong type names the key, the type and the value), and --help lists the settings
# with their defaults and the comments beside them in the script.
# A setting that may be None declares its types with an annotation, e.g. `top_p: float | None = None`.
# (This file is exec'd inside the script, so it has no docstring: one would replace the script's own.)
import sys as _sys


def _configure(g):
    import ast
    import builtins  # a script's own setting may be called compile (sample.py's is)
    import difflib
    import io
    import os
    import tokenize
    import types

    script = os.path.basename(_sys.argv[0])
    plain = (bool, int, float, str, tuple, list, type(None))
    # settings are the script's lowercase globals of plain types (ALL_CAPS names are constants, not settings)
    settings = [k for k, v in g.items() if not k.startswith('_') and not k.isupper() and isinstance(v, plain)]
    annotations = g.get('__annotations__', {})

    def die(msg):
        _sys.exit(f"{script}: error: {msg}")

    def expected_type(key):
        return annotations.get(key, type(g[key]))

    def type_name(t):
        if isinstance(t, types.UnionType):
            return ' or '.join(type_name(a) for a in t.__args__)
        return {bool: 'bool (True/False)', int: 'int', float: 'float', str: 'str', tuple: 'tuple', list: 'list',
                type(None): 'None'}.get(t, getattr(t, '__name__', str(t)))

    def convert(key, value, raw):
        """value as the setting's type, or a one-line error. raw is the command-line text (None from a file)."""
        if key not in settings:
            close = difflib.get_close_matches(key, settings, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            die(f"unknown setting {key!r}{hint} (--help lists them)")
        want = expected_type(key)
        if value is None and g[key] is None:
            return None
        allowed = want.__args__ if isinstance(want, types.UnionType) else (want,)
        if isinstance(value, bool) and bool not in allowed:
            pass  # True is an int to Python, but not to a user who meant a number
        elif isinstance(value, allowed):
            return value
        elif float in allowed and isinstance(value, int):
            return float(value)
        elif int in allowed and isinstance(value, float) and value.is_integer():
            return int(value)  # --max_iters=1e4
        elif isinstance(value, (list, tuple)) and (list in allowed or tuple in allowed):
            return (tuple if tuple in allowed else list)(value)
        if str in allowed and raw is not None:
            return raw  # --start=42 is the text "42"
        shown = raw if raw is not None else repr(value)
        die(f"{key} expects {type_name(want)}, got {shown!r}")

    def set_setting(key, value, raw=None):
        value = convert(key, value, raw)
        print(f"overriding: {key} = {value!r}", file=_sys.stderr)
        g[key] = value

    def show_help():
        """Every setting with its default and the comment beside it in the script."""
        comments, lines = {}, {}
        path = g.get('__file__', _sys.argv[0])
        try:
            src = open(path).read()
            for tok in tokenize.generate_tokens(io.StringIO(src).readline):
                if tok.type == tokenize.COMMENT:
                    comments[tok.start[0]] = tok.string.lstrip('#').strip()
            for node in ast.parse(src).body:
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, ast.AnnAssign) else []
                for t in targets:
                    if isinstance(t, ast.Name) and t.id in settings and t.id not in lines:
                        lines[t.id] = node.lineno
                        comments.setdefault(node.lineno, comments.get(node.end_lineno, ''))
        except (OSError, SyntaxError):
            pass
        doc = (g.get('__doc__') or '').strip()
        print(f"usage: python {script} [config_file.py ...] [--key=value ...]")
        if doc:
            print('\n' + doc)
        print('\nsettings (default, then what it does):')
        order = sorted(settings, key=lambda k: lines.get(k, 1 << 30))
        width = max(len(k) for k in order) if order else 0
        for k in order:
            default = repr(g[k])
            default = default if len(default) <= 40 else default[:37] + '...'
            print(f"  --{k:<{width}} = {default:<20} {comments.get(lines.get(k), '')}")
        _sys.exit(0)

    for arg in _sys.argv[1:]:
        if arg in ('-h', '--help'):
            show_help()
        if '=' not in arg:
            if arg.startswith('-'):
                die(f"expected --key=value or a config file, got {arg!r}")
            if not os.path.isfile(arg):
                die(f"config file {arg!r} not found")
            if not arg.endswith('.py'):  # a config file is Python and is run: only ever a .py file the user means
                die(f"{arg!r} is not a config file (a .py file); settings are --key=value")
            ns = {k: g[k] for k in settings}  # a config file may read the current settings
            try:
                exec(builtins.compile(open(arg).read(), arg, 'exec'), ns)
            except Exception as e:
                tb = e.__traceback__.tb_next if e.__traceback__ else None
                line = getattr(e, 'lineno', None) or (tb.tb_lineno if tb else '?')
                die(f"config file {arg!r} failed at line {line}: {type(e).__name__}: {e}")
            print(f"overriding config with {arg}", file=_sys.stderr)
            for k, v in ns.items():
                if k.startswith('_') or isinstance(v, (types.ModuleType, types.FunctionType, type)):
                    continue
                if k not in settings or type(v) is not type(g[k]) or v != g[k]:
                    set_setting(k, v)
        else:
            key, raw = arg.split('=', 1)
            if not key.startswith('--') or len(key) < 3:
                die(f"expected --key=value, got {arg!r}")
            try:
                value = ast.literal_eval(raw)
            except (SyntaxError, ValueError):
                value = raw  # not a Python literal: a string
            set_setting(key[2:], value, raw)


_configure(globals())
del _configure
