"""Training entry point: ``accelerate launch train.py --config dmd2_sdxl [key=value ...]``.

A thin shim over ``stepdistill.train.main`` (also available as ``stepdistill train``).
"""

from stepdistill.train import main

if __name__ == "__main__":
    main()
