# Poor man's configurator, after nanoGPT's. A script defines its settings as globals, then runs
#     exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# and the command line overrides them:
#     python sample.py config/my_config.py --temperature=0.5 --start="Hello"
#     python train.py --block_size 32 --input_files a.txt b.txt --compile      (argparse's spellings work too)
# A config file is Python that assigns settings (it can read the current ones). --key=value values are
# parsed with ast.literal_eval, and kept as the raw string when that fails (or when the setting is a string);
# a list setting takes 'a,b' or several values after its --key (joined as 'a,b'); a bool setting alone is True.
# The course starter's flags (pico-llm.py) are translated where a setting here means the same, with a note,
# and otherwise refused with a pointer to README's table of them (STARTER_FLAGS below).
# What nanoGPT lacks: every mistake is one line on stderr and exit status 1 (an unknown key names the closest
# known one; a value of the wrong type names the key, the type and the value), and --help lists the settings
# with their defaults and the comments beside them in the script.
# A setting that may be None declares its types with an annotation, e.g. `top_p: float | None = None`.
# (This file is exec'd inside the script, so it has no docstring: one would replace the script's own.)
import sys as _sys

# The course starter's flags that are not settings here: flag -> (setting here, factor, what it becomes)
STARTER_FLAGS = {
    'device_id': ('device', 1, ''),
    'prompt': ('start', 1, ''),  # (train.py's is called prompt, as the starter's)
    'max_steps_per_epoch': ('max_iters', 3, "steps in all: the starter's 3 epochs of max_steps_per_epoch"),
    'kgram_chunk_size': (None, 1, "the k-gram MLP computes every position at once, with no chunks to size"),
    'monosemantic_enabled': (None, 1, "interpret.py --sae=True trains a sparse autoencoder on a trained model"),
}


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

    def allows_list(key):
        want = expected_type(key)
        return bool({list, tuple} & set(want.__args__ if isinstance(want, types.UnionType) else (want,)))

    def convert(key, value, raw):
        """value as the setting's type, or a one-line error. raw is the command-line text (None from a file)."""
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

    def known(key, value):
        """(key, value) of a setting of this script, translating the course starter's flags (or a one-line error)."""
        if key in settings:
            return key, value
        if key in STARTER_FLAGS:
            ours, scale, why = STARTER_FLAGS[key]
            if ours not in settings:
                die(f"--{key} is a flag of the course's starter script; here: {why} (README: 'From the starter's flags')")
            value = value * scale if scale != 1 and isinstance(value, (int, float)) else value
            print(f"note: the starter's --{key} is --{ours} here{f' ({why})' if why else ''}", file=_sys.stderr)
            return ours, value
        close = difflib.get_close_matches(key, settings, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        die(f"unknown setting {key!r}{hint} (--help lists them)")

    def literal(raw):
        try:
            return ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            return raw  # not a Python literal: a string

    def set_setting(key, value, raw=None):
        key, value = known(key, value)
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

    args, i = _sys.argv[1:], 0
    while i < len(args):
        arg, i = args[i], i + 1
        if arg in ('-h', '--help'):
            show_help()
        if arg.startswith('--') and '=' in arg:
            key, raw = arg.split('=', 1)
            if len(key) < 3:
                die(f"expected --key=value, got {arg!r}")
            set_setting(key[2:], literal(raw), raw)
        elif arg.startswith('--') and len(arg) > 2:  # argparse's spelling: --key value, --key v1 v2, --flag
            key = arg[2:]
            name = key if key in settings else STARTER_FLAGS.get(key, (None,))[0]
            if name is None and key in STARTER_FLAGS:
                known(key, None)  # a starter flag with no setting here: its one-line pointer
            many = name in settings and allows_list(name)
            values = []
            while i < len(args) and not args[i].startswith('--') and (many or not values):
                values.append(args[i])
                i += 1
            if not values and name in settings and isinstance(g[name], bool):
                values = ['True']  # a bare --compile means True
            if not values:
                die(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
            raw = ','.join(values)  # several values are a comma-separated list, as --key=a,b
            set_setting(key, literal(raw), raw)
        elif '=' in arg or arg.startswith('-'):
            die(f"expected --key=value, --key value or a config file, got {arg!r}")
        else:
            if not os.path.isfile(arg):
                die(f"config file {arg!r} {'is a folder' if os.path.isdir(arg) else 'not found'}")
            if not arg.endswith('.py'):  # a config file is Python and is run: only ever a .py file the user means
                die(f"{arg!r} is not a config file (a .py file); settings are --key=value")
            ns = {k: g[k] for k in settings}  # a config file may read the current settings
            try:
                with open(arg, 'rb') as f:
                    src = f.read().decode('utf-8-sig')  # (-sig: Windows editors may begin a file with a BOM)
            except UnicodeDecodeError as e:
                die(f"config file {arg!r} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start})")
            except OSError as e:
                die(f"config file {arg!r} cannot be read ({e.strerror})")
            try:
                exec(builtins.compile(src, arg, 'exec'), ns)
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

_configure(globals())
del _configure
