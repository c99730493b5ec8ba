from slimllm.cli import main

main()
