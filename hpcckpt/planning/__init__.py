"""Pure planning: boxes -> byte runs -> who reads, sends and writes what. No mpi4py here."""
