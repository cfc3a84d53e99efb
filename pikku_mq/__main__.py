"""``python -m pikku_mq``: the ``pikku-mq`` command."""

from pikku_mq.cli import main

if __name__ == "__main__":
    main()
