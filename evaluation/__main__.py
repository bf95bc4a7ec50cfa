"""`python -m evaluation --run RUN [...]`: evaluate a run's best model and write its report (evaluation.run)."""

import sys

from evaluation.run import main

sys.exit(main())
