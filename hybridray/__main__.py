import sys

from hybridray.cli import main

sys.exit(main())
