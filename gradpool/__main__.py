from gradpool.cli import main

main()
