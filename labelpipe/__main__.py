from labelpipe.entry import main

main()
