import sys

from ntk_compiler.cli import main

sys.exit(main())
