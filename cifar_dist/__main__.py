import sys

from cifar_dist.cli import main

sys.exit(main())
