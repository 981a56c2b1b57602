"""`python -m kcl_ext.training ...` is `kcl-train ...`."""
import sys

from .cli import main

sys.exit(main())
