import sys

from m4d.model.kernels import main

sys.exit(main())
