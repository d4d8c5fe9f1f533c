"""Paper Fig. 3 query template (the scorer lands with the reward issue)."""
QUERY_TEMPLATE = ('Both of these two images are generated results of {task}. Please evaluate the difference of '
                  'the two images. Is the {first} image better than the {second} one? Please answer "yes" or "no". '
                  'The evaluation criteria is {dimension}.')
