"""`make demo`: synthetic data -> train SAT and CAM -> localize -> evaluate -> table, query, picture."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.demo import DemoOptions, run_demo  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default="demo_out", help="where data, checkpoints and outputs go (reused on rerun)")
    p.add_argument("--epochs", type=int, default=DemoOptions.epochs, help="training epochs for both methods")
    p.add_argument("--train-samples", type=int, default=DemoOptions.train_samples)
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    run_demo(DemoOptions(workdir=a.workdir, epochs=a.epochs, train_samples=a.train_samples,
                         num_workers=a.num_workers, seed=a.seed))


if __name__ == "__main__":
    main()
