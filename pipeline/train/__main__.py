"""`python -m pipeline.train --config X.yaml key=value …`, unchanged under deepspeed, torchrun and srun."""

from pipeline.cli import main

main(["train", *__import__("sys").argv[1:]])
