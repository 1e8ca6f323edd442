"""Online experts served beside the adapted ONNX model, mixed by their live losses.

``experts.py`` holds the learners (numpy only: the serving process never imports torch),
``fixed_share.py`` the mixing rule and its regret bound, ``portfolio.py`` one stream's
portfolio: predict with every member, mix, and learn from each label once it arrives.
"""
