"""Moved: the data-set generator is :mod:`reidlib.demo.synth` (``python -m reidlib.demo.synth``)."""
import sys


def __getattr__(name):
    raise AttributeError(f"reidlib.data.synth moved: use reidlib.demo.synth.{name}")


if __name__ == "__main__":
    sys.exit("reidlib.data.synth moved: run python -m reidlib.demo.synth with the same arguments")
