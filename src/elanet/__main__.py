"""``python -m elanet ...`` (also what ``torchrun -m elanet train ...`` runs)."""
import sys

from .cli import main

sys.exit(main())
