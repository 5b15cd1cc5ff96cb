"""``fastlm eval``: checkpoints side by side (perplexity, or a task's metrics)."""
from __future__ import annotations


# ----------------------------------------------------------------------------- eval
def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate checkpoints side by side (perplexity, or a task's metrics)")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint directories")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="text file, folder of texts, or prepared folder (its val documents); task data for other tasks")
    p.add_argument("--task", choices=["lm", "classification", "translation"], default="lm",
                   help="lm (default): perplexity, nll, bits per byte; the others need fastlm.metrics")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--png", metavar="OUT", help="write a chart of the results (needs matplotlib)")
    p.add_argument("--stride", type=int, help="lm: tokens between window starts (default max-length / 2)")
    p.add_argument("--max-length", type=int, help="lm: window length (default: each model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="lm: windows per forward pass (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal anyway)")


def _run_eval(args):
    if args.task != "lm":
        from fastlm.metrics import evaluate_task

        evaluate_task(args.task, args.checkpoints, args.data, json_out=args.json, png_out=args.png,
                      progress=not args.quiet)
        return 0
    from pathlib import Path

    from fastlm.evaluate import LM_COLUMNS, compare_checkpoints
    from fastlm.report import bar_png, format_table, write_json

    rows = compare_checkpoints(args.checkpoints, args.data, stride=args.stride, max_length=args.max_length,
                               batch_size=args.batch_size, progress=not args.quiet)
    print(format_table(rows, LM_COLUMNS))
    if args.json:
        write_json(args.json, {"task": "lm", "data": str(args.data), "stride": args.stride,
                               "max_length": args.max_length, "results": rows})
    if args.png:
        names = [Path(r["model"]).name for r in rows]
        if len(set(names)) < len(names):  # e.g. run1/best and run2/best
            names = ["/".join(Path(r["model"]).parts[-2:]) for r in rows]
        bar_png(args.png, names, [r["perplexity"] for r in rows],
                "perplexity", f"perplexity on {Path(args.data).name}")
    return 0
