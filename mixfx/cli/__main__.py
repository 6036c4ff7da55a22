"""`python -m mixfx.cli ...` is `mixfx ...`."""
from mixfx.cli import main

main()
