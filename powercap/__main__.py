import sys

from powercap.cli import main

sys.exit(main())
