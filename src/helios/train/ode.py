"""``python -m helios.train.ode CONFIG``: make the teacher's ODE pairs (see :mod:`helios.train.stage3.ode`)."""

import sys

from helios.train.stage3.ode import main

if __name__ == "__main__":
    sys.exit(main())
