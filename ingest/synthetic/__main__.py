"""`python -m wit.ingest.synthetic generate OUT` / `serve OUT`: the synthetic web by hand."""

from __future__ import annotations

import argparse
import json
import time

from wit.ingest.synthetic.generate import DEFAULT_BASE_URL, generate_web
from wit.ingest.synthetic.server import SyntheticWebServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wit.ingest.synthetic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a synthetic web into OUT")
    gen.add_argument("out")
    gen.add_argument("--pages", type=int, default=1000)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--base-url", default=DEFAULT_BASE_URL, help="host of the WARC copy and of the truth")
    gen.add_argument("--overwrite", action="store_true")
    srv = sub.add_parser("serve", help="serve a generated web on 127.0.0.1 until interrupted")
    srv.add_argument("out")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--delay-scale", type=float, default=1.0)
    args = parser.parse_args(argv)

    if args.command == "generate":
        info = generate_web(
            args.out, pages=args.pages, seed=args.seed, base_url=args.base_url, overwrite=args.overwrite
        )
        summary = {"pages": info.pages, "images": info.images, "counts": info.counts, "timings": info.timings}
        print(json.dumps(summary, indent=1))
        return 0
    with SyntheticWebServer(args.out, port=args.port, delay_scale=args.delay_scale) as server:
        print(f"serving {args.out} at {server.base_url}/index.html (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
