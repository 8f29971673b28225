"""python -m tunvpnd.lab echo-server PORT | echo-client HOST PORT NBYTES"""

import sys

from .echo import main

sys.exit(main())
