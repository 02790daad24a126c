"""
@article{Strelak2020FlexAlign,
  title = {FlexAlign: An Accurate and Fast Algorithm for Movie Alignment in Cryo-Electron Microscopy},
  author = {St\v{r}el\'ak, David and Filipovi\v{c}, Ji\v{r}\'i and Jim\'enez-Moreno, Amaya and Carazo, Jos\'e Mar\'ia and Sorzano, Carlos \'Oscar S\'anchez},
  journal = {Electronics},
  volume = {9},
  number = {6},
  pages = {1040},
  year = {2020},
  doi = {http://doi.org/10.3390/electronics9061040}
}

@article{Strelak2019Reconstruction,
  title = {A GPU acceleration of 3-D Fourier reconstruction in cryo-EM},
  author = {St\v{r}el\'ak, David and Sorzano, Carlos \'Oscar S. and Carazo, Jos\'e Mar\'ia and Filipovi\v{c}, Ji\v{r}\'i},
  journal = {The International Journal of High Performance Computing Applications},
  volume = {33},
  number = {5},
  pages = {948--959},
  year = {2019},
  doi = {http://doi.org/10.1177/1094342019832958}
}

@article{JimenezMoreno2021DeepAlign,
  title = {DeepAlign, a 3D alignment method based on regionalized deep learning for Cryo-EM},
  author = {Jim\'enez-Moreno, Amaya and St\v{r}el\'ak, David and Filipovi\v{c}, Ji\v{r}\'i and Carazo, Jos\'e Mar\'ia and Sorzano, Carlos \'Oscar S.},
  journal = {Journal of Structural Biology},
  volume = {213},
  number = {2},
  pages = {107712},
  year = {2021},
  doi = {http://doi.org/10.1016/j.jsb.2021.107712}
}

@article{Petrovic2020KTT,
  title = {A benchmark set of highly-efficient CUDA and OpenCL kernels and its dynamic autotuning with Kernel Tuning Toolkit},
  author = {Petrovi\v{c}, Filip and St\v{r}el\'ak, David and Hozzov\'a, Jana and Ol'ha, Jaroslav and Trembeck\'y, Richard and Benkner, Siegfried and Filipovi\v{c}, Ji\v{r}\'i},
  journal = {Future Generation Computer Systems},
  volume = {108},
  pages = {161--177},
  year = {2020},
  doi = {http://doi.org/10.1016/j.future.2020.02.069}
}

@inproceedings{Strelak2018cuFFTAdvisor,
  title = {Performance analysis and autotuning setup of the cuFFT library},
  author = {St\v{r}el\'ak, David and Filipovi\v{c}, Ji\v{r}\'i},
  booktitle = {Proceedings of the 2nd Workshop on AutotuniNg and aDaptivity AppRoaches for Energy efficient HPC Systems (ANDARE)},
  pages = {1--6},
  year = {2018},
  doi = {http://doi.org/10.1145/3295816.3295817}
}

@article{Strelak2023Umpalumpa,
  title = {Umpalumpa: a framework for efficient execution of complex image processing workloads on heterogeneous nodes},
  author = {St\v{r}el\'ak, David and Myška, David and Petrovi\v{c}, Filip and Filipovi\v{c}, Ji\v{r}\'i and Carazo, Jos\'e Mar\'ia and Sorzano, Carlos \'Oscar S.},
  journal = {Computing},
  volume = {105},
  pages = {2389--2417},
  year = {2023},
  doi = {http://doi.org/10.1007/s00607-023-01190-w}
}
"""
