"""``pharmafl bench trunk|fra-lora|secagg|poc``: benchmarks, JSON on the last line."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_bench_trunk(args: argparse.Namespace) -> int:
    from pharmafl.multitask.bench import bench_trunk

    result = bench_trunk(args.data, args.rounds, args.workdir)
    print(json.dumps(result))
    return 0


def cmd_bench_dp(args: argparse.Namespace) -> int:
    from pharmafl.multitask.bench import bench_dp

    print(json.dumps(bench_dp(args.data, args.steps, args.workdir, args.repeats)))
    return 0


def cmd_bench_fra_lora(args: argparse.Namespace) -> int:
    from pharmafl.aggregation.bench import bench_fra_lora

    result = bench_fra_lora(
        args.geometries,
        args.clients,
        args.rank,
        args.repeats,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
        breakdown=args.breakdown,
    )
    print(json.dumps(result))
    return 0


def cmd_bench_secagg(args: argparse.Namespace) -> int:
    import logging

    from pharmafl.secure_sum import bench as bench_secagg

    logging.getLogger("pharmafl.secure_sum").setLevel(logging.ERROR)
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.quick:
        result = bench_secagg.quick_bench(progress=say)
    else:
        result = bench_secagg.run_secagg_bench(args.lengths, args.clients, progress=say)
    if args.rounds > 0:
        from pharmafl.multitask.bench import job_overhead

        walls = job_overhead(args.data, args.rounds, args.workdir)
        say(f"multitask_secure {walls['secure_s']} s vs multitask_fedavg {walls['fedavg_s']} s")
        result.update(job_overhead=walls["ratio"], job_walls=walls)
    print(json.dumps(result))
    return 0


def cmd_bench_poc(args: argparse.Namespace) -> int:
    from pharmafl.consortium.bench import bench_poc

    result = bench_poc(args.data, args.rounds, args.workdir, args.port, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmarks (JSON on the last line)").add_subparsers(
        dest="kind", required=True
    )
    trunk = bench.add_parser("trunk", help="local training throughput and federated overhead")
    trunk.add_argument("--json", action="store_true", help="print JSON (always on; kept for symmetry)")
    trunk.add_argument("--data", default=None, help="prepared data (default: ChEMBL, 3 partners, prepared once)")
    trunk.add_argument("--rounds", type=int, default=3)
    trunk.add_argument("--workdir", default="runs/bench", help="scratch folder")
    trunk.set_defaults(func=cmd_bench_trunk)
    dp = bench.add_parser("dp", help="DP-SGD step time vs the plain step of the multi-task trainer")
    dp.add_argument("--json", action="store_true", help="print JSON (always on; kept for symmetry)")
    dp.add_argument("--data", default=None, help="prepared data (default: ChEMBL, 3 partners, prepared once)")
    dp.add_argument("--steps", type=int, default=30, help="steps timed per repeat")
    dp.add_argument("--repeats", type=int, default=3)
    dp.add_argument("--workdir", default="runs/bench", help="scratch folder")
    dp.set_defaults(func=cmd_bench_dp)

    fra = bench.add_parser("fra-lora", help="factored vs dense FRA-LoRA aggregation at ESM-2 geometries")
    fra.add_argument("--json", action="store_true", help="print JSON (always on; kept for symmetry)")
    fra.add_argument("--geometries", nargs="+", default=["35M", "650M", "3B", "15B"])
    fra.add_argument("--clients", nargs="+", type=int, default=[2, 8, 32])
    fra.add_argument("--rank", type=int, default=16)
    fra.add_argument("--repeats", type=int, default=3)
    fra.add_argument(
        "--breakdown", action="store_true", help="also time one module's stages (stack, Gram matrices, the rest)"
    )
    fra.set_defaults(func=cmd_bench_fra_lora)
    secagg = bench.add_parser("secagg", help="masked secure sum vs plaintext and NVFLARE's CKKS")
    secagg.add_argument("--json", action="store_true", help="print JSON (always on; kept for symmetry)")
    secagg.add_argument("--quick", action="store_true", help="a small subset: 1e5..1e7 values, 3 and 16 sites")
    secagg.add_argument("--lengths", nargs="+", type=int, default=[10**5, 10**6, 10**7, 10**8])
    secagg.add_argument("--clients", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64])
    secagg.add_argument(
        "--rounds", type=int, default=3, help="rounds of multitask_secure vs multitask_fedavg (0: skip job_overhead)"
    )
    secagg.add_argument("--data", default=None, help="prepared chem data for job_overhead (default: ChEMBL, 3 sites)")
    secagg.add_argument("--workdir", default="runs/bench", help="scratch folder")
    secagg.set_defaults(func=cmd_bench_secagg)
    bench_poc = bench.add_parser("poc", help="POC up + a multi-task job as the lead + POC down, wall time")
    bench_poc.add_argument("--json", action="store_true", help="print JSON (always on; kept for symmetry)")
    bench_poc.add_argument("--data", default=None, help="prepared data (default: ChEMBL, 3 partners, prepared once)")
    bench_poc.add_argument("--rounds", type=int, default=2)
    bench_poc.add_argument("--workdir", default="runs/bench", help="scratch folder (own POC workspace and HOME)")
    bench_poc.add_argument("--port", type=int, default=None, help="server FL port (default 8002)")
    bench_poc.set_defaults(func=cmd_bench_poc)
