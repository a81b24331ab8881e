from maxdnn.cli import main

main()
