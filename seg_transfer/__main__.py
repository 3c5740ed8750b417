import sys

from seg_transfer.cli import main

sys.exit(main())
