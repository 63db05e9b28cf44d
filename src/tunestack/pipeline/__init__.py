"""`tunestack run recipe.yaml`: the whole pipeline from one recipe, cached, resumable, with a report at the end.

See tunestack.pipeline.recipe for the recipe format. A stage whose output is complete and whose fingerprint
(options, input model, data content, tunestack version) is unchanged is skipped; an interrupted one resumes from
its last checkpoint; a changed one runs again, and so does every stage that reads its output.
"""

from __future__ import annotations

import argparse

from tunestack.pipeline.recipe import __doc__ as RECIPE_HELP


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunestack run",
        description="Run a pipeline recipe: stages in order, each skipped when its output is up to date.",
        epilog=RECIPE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="the recipe YAML file")
    parser.add_argument("--dry_run", action="store_true", help="print the plan (cached / resume / run) and stop")
    parser.add_argument("--from", dest="from_stage", metavar="STAGE", help="run this stage and every later one again")
    parser.add_argument("--only", metavar="STAGE", help="run only this stage (its inputs must be complete)")
    parser.add_argument("--output_root", help="override the recipe's output_root")
    parser.add_argument("--no_report", action="store_true", help="do not write report.html / report.md at the end")
    parser.add_argument(
        "--node_rank",
        type=int,
        default=None,
        help="this machine's rank in the stages with nnodes > 1 (run the same recipe on every node; node 0 also "
        "runs the single-node stages and writes the records; the output root must be a shared folder)",
    )
    return parser


def main(argv: list[str]) -> int:
    from tunestack.errors import ConfigError
    from tunestack.locks import WriterLock
    from tunestack.pipeline.plan import describe_plan, make_plan
    from tunestack.pipeline.recipe import load_recipe
    from tunestack.pipeline.runner import refuse_under_torchrun, run_steps
    from tunestack.rundir import LOCK_FILE

    args = _parser().parse_args(argv)
    if args.from_stage and args.only:
        raise ConfigError("give --from or --only, not both")
    refuse_under_torchrun()
    recipe = load_recipe(args.recipe, args.output_root, args.node_rank)
    if args.dry_run:
        print(describe_plan(recipe, make_plan(recipe, args.from_stage, args.only), commands=True))  # noqa: T201
        return 0
    if recipe.node_rank > 0:  # node 0 holds the output root's lock and writes; this node only joins
        return run_steps(recipe, make_plan(recipe, args.from_stage, args.only), report=False)
    # One pipeline at a time per output root: a second one would plan resumes of folders the first is writing.
    lock = WriterLock(recipe.output_root / LOCK_FILE, recipe.output_root).acquire()
    try:
        return run_steps(recipe, make_plan(recipe, args.from_stage, args.only), report=not args.no_report)
    finally:
        lock.release()
