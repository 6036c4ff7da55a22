"""`python -m mixfx ...` is `mixfx ...`."""
from mixfx.cli import main

main()
