import sys

from p2pz.cli import main

sys.exit(main())
