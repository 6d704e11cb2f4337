from clinqa.cli import main

main()
