"""``fastjac info``."""
import json


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args):
    from ._info import info
    if args.json:
        import io
        print(json.dumps(info(file=io.StringIO()), indent=2))
    else:
        info()
    return 0
