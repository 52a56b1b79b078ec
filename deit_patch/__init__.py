"""maskedkd: the DeiT overlay package (hooks, mask selection, teacher pruning, cost accounting, training glue)."""
