from rwkv2rknn.cli import main

main()
