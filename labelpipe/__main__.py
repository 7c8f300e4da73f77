from labelpipe.cli import main

main()
