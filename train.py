"""Train a vision-language model with SafeGRPO.

    python train.py --config configs/tiny.yaml [--set key=value ...] [--resume]
    python train.py --export-merged runs/x/checkpoints/step_N OUT_DIR   (a LoRA checkpoint as a plain model)
    torchrun --nproc_per_node N train.py --config ...      (FSDP2 over N processes, see distributed.py)

Steps: generate/load data, build or load the model, optional warm-start SFT, greedy evaluation
of the starting policy on the test split, SafeGRPO, evaluation again, a before/after table,
and a PNG of the reward curves. Everything lands in train.out_dir. Under torchrun, rank 0 alone
runs the warm start and the evaluations and writes files; all ranks train.
"""
import argparse
import sys
import time

from safegrpo import distributed as dist
from safegrpo.checkpoint import CheckpointError, RunDirError
from safegrpo.config import Config, load_config
from safegrpo.eval.metrics import comparison_table
from safegrpo.files import NotOursError, write_atomic
from safegrpo.options import describe
from safegrpo.eval.plots import plot_rewards
from safegrpo.trainer import NonFiniteError, NothingToLearnError, Trainer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="options (config keys; set in the YAML file or with --set key=value):\n\n"
                                        + describe(Config))
    ap.add_argument("--config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resume", action="store_true", help="continue from the last intact checkpoint in train.out_dir")
    ap.add_argument("--overwrite", action="store_true",
                    help="delete the run already in train.out_dir (its files only) and start again")
    ap.add_argument("--export-merged", nargs=2, metavar=("CHECKPOINT", "OUT_DIR"),
                    help="write a LoRA checkpoint as a Hugging Face model directory with the adapter merged, and exit")
    args = ap.parse_args(argv)
    if args.export_merged:
        from safegrpo.lora import is_adapter_dir
        from safegrpo.model import export_merged
        ckpt, out = args.export_merged
        if not is_adapter_dir(ckpt):
            print(f"[error] {ckpt} is not a LoRA checkpoint (no adapter_config.json)", file=sys.stderr)
            return 2
        try:
            print(f"merged model: {export_merged(ckpt, out)}")
        except NotOursError as e:
            print(f"[error] {e}", file=sys.stderr)
            return 2
        return 0
    if not args.config:
        ap.error("--config is required")
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"[error] {e}", file=sys.stderr)
        return 2
    cfg.train.device = str(dist.init_from_env(cfg.train.device, cfg.train.collective_timeout_s))   # torchrun: join the process group
    t_start = time.time()
    try:                   # what can be known before the warm start: one line, no traceback
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    except (RunDirError, CheckpointError, NotOursError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"[error] {e}", file=sys.stderr)
        return 2
    try:
        code = run(cfg, trainer, t_start)
    except (RunDirError, CheckpointError, NotOursError) as e:
        print(f"[error] {e}", file=sys.stderr)
        return 2
    if code == 0:          # after a failure torchrun tears the group down; a barrier could pair
        dist.shutdown(trainer.close)   # with another rank's training collective and hang
    return code


def run(cfg, trainer: Trainer, t_start: float) -> int:
    """Warm start, evaluation, SafeGRPO, evaluation; returns the exit code."""
    main_rank = dist.is_main()
    say = print if main_rank else (lambda *a, **k: None)
    say(f"[world] {dist.world_size()} process(es), device {cfg.train.device}")
    say(f"[data] train {len(trainer.train_records)} records, test {len(trainer.test_records)}; "
        f"model {trainer.model_dir}; run {trainer.out}")
    init = trainer.warm_start()                            # the model GRPO starts from (and the reference)
    before = trainer.evaluate("before", init) if main_rank else None
    dist.barrier()
    try:
        final = trainer.fit(init_path=init)
    except (NonFiniteError, NothingToLearnError) as e:
        print(f"[error] {e}", file=sys.stderr)
        return 2
    if not main_rank:
        return 0
    plot = plot_rewards(trainer.out / "metrics.jsonl", trainer.out / "reward_curves.png")
    after = trainer.evaluate("after", trainer.policy.model if not dist.active() else final)
    print(f"\nfinal checkpoint: {final}\nreward curves: {plot}\nwall time: {time.time() - t_start:.0f} s")
    if before and after:
        table = comparison_table({"warm start (before)": before, "SafeGRPO (after)": after})
        write_atomic(trainer.out / "eval_table.md", table)
        print(f"\nHeld-out test split ({after['n']} items, greedy):\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
