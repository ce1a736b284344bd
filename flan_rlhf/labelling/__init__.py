"""Human feedback: a label store (:mod:`.store`), the labelling page (:mod:`.server`) and ``flan-rlhf label`` (:mod:`.command`)."""
