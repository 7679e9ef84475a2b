"""Test-only entry point: dimscale/train.py with faults injected by monkeypatching (none live in shipping code).

    torchrun ... tests/fault_trainer.py --config ... --pause-before-publish IMAGES:SECONDS
    torchrun ... tests/fault_trainer.py --config ... --die-after-publish IMAGES

--pause-before-publish: every rank has written its share of checkpoint IMAGES; rank 0 sleeps before publishing it
(widens the kill window). --die-after-publish: rank 0 SIGKILLs itself right after checkpoint IMAGES became
`latest` (before the snapshot and done.json that follow the final checkpoint).
"""
import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dimscale import checkpoint, train  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--pause-before-publish", default="")
    p.add_argument("--die-after-publish", type=int, default=-1)
    args, rest = p.parse_known_args()
    pause_at, pause_s = (int(v) if i == 0 else float(v)
                         for i, v in enumerate(args.pause_before_publish.split(":"))) \
        if args.pause_before_publish else (-1, 0.0)
    real_publish = checkpoint.publish

    def publish(ckpt_dir, tmp, name):
        images = int(name[len("img"):])
        if images == pause_at:
            time.sleep(pause_s)
        real_publish(ckpt_dir, tmp, name)
        if images == args.die_after_publish:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.publish = publish
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())
