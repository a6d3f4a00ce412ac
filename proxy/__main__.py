import sys

from idemproxy.cli import main

sys.exit(main())
