"""`python -m funnel_hpc.worker run ...`: see worker/main.py."""

import sys

from funnel_hpc.worker.main import main

sys.exit(main())
