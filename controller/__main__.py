"""`python -m controller` is `pluginctl`."""

from controller.cli import main

main()
