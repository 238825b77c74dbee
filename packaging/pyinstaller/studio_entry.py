"""Entry point of the frozen app: the same `studio` command line as the wheel's console script.

The frozen executable is also the engine: EngineClient starts it again with `engine` as its first
argument (studio.client.engine_command), so the bundle needs no Python of its own on PATH.
"""

import multiprocessing
import sys

from studio.cli import main

if __name__ == "__main__":
    multiprocessing.freeze_support()  # Windows: a frozen child that multiprocessing starts must stop here
    sys.exit(main())
