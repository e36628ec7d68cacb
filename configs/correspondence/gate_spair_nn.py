# The GATE authors' "nn" setting: their aggregation network without the output convolution
# (the amalgamated features and the attention maps matched as they are).
#   python tools/correspondence.py train configs/correspondence/gate_spair_nn.py
_base_ = ['./gate_spair.py']
aggregator = dict(output='nn')
work_dir = 'work_dirs/correspondence/gate_spair_nn'
