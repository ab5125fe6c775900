from tickbridge.cli import main

main()
