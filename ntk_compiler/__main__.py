from ntk_compiler.cli import main

main()
