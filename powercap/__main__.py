import sys

from powercap.commands import main

sys.exit(main())
