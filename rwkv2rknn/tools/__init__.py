"""Tools around a compiled artifact: check, compare, evaluate, bench, measure, doctor, report."""
