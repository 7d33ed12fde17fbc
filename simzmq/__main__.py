from simzmq.cli import main

main()
