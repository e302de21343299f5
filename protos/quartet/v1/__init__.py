"""Generated from protos/quartet/v1/*.proto by `python scripts/gen_protos.py`. Do not edit the *_pb2* files."""
