"""One module per DVC stage; each is a thin ``main()`` over the ``kd`` library."""
