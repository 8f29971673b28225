"""python -m tunvpnd.lab echo-server PORT | echo-client HOST PORT NBYTES
                       | sniff IFNAME PORT HEXPATTERN"""

import sys

if sys.argv[1:2] == ["sniff"]:
    from .sniff import main as sniff_main

    sys.exit(sniff_main(sys.argv[2:]))

from .echo import main

sys.exit(main())
