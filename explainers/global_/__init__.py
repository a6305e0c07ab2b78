"""Dataset-wide explanations: permutation importance, partial dependence and ICE, Shapley
values aggregated over rows (with TreeSHAP interactions), and projections of rows. Each long
computation is a job (explainers.global_.jobs): a generator of progress reports that returns its
result, stops when its caller asks and ends early, with a partial result, on its budget."""
